"""`hidream bench --dry-run`: one request and one denoising step of the engine's own code path, on fake tensors.

The model's weights are FakeTensors (shape, dtype and device, no storage), so the full 8B configuration runs
on any CPU in seconds and nothing is loaded. Tokenization and image preprocessing run for real on small CPU
data; everything that touches a weight is fake. Three figures come out:

- flops: torch's flop counter books every GEMM and convolution; attention is computed from each
  `scaled_dot_product_attention` call's shapes (4 * Sq * Sk * head_dim * heads per batch row) and added
  wherever the counter booked nothing for the call (on the CPU it does not know the fused SDPA kernels);
- the seconds floor: flops per image over a given dense throughput;
- peak memory: the bytes of every live tensor storage (weights, K/V buffers, activations), at its highest.

These are estimates of what the code asks of a device, not measurements of one.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode
from torch.utils.weak import WeakIdKeyDictionary

from hidream.bench import PROMPT, _references
from hidream.engine import images as img
from hidream.engine.config import ModelSpec
from hidream.engine.errors import GenerationCanceled
from hidream.engine.pipeline import Engine
from hidream.engine.sampling import Denoiser, denoise
from hidream.engine.schedulers import EulerFlow, UniPCMultistep, linear_schedule, unipc_schedule
from hidream.engine.sequence import UNCONDITIONAL_PROMPT, PromptEncoder
from hidream.engine.stepcache import POLICIES, StepCache

DEFAULT_TFLOPS = 800.0
# What the figures are, said wherever they are shown.
ESTIMATE = ("estimate from fake tensors: no weights loaded, no device used; "
            "flops from torch's counter plus attention by formula, memory from live tensor bytes")


def attention_flops(q: torch.Size, k: torch.Size, v: torch.Size) -> int:
    """Matmul flops of one attention call, q [..., H, Sq, D], k [..., Hk, Sk, D], v [..., Hk, Sk, Dv]:
    2*Sq*Sk*D for the scores plus 2*Sq*Sk*Dv for the weighted sum, per head and batch row.
    A causal call is counted in full, as torch's counter counts SDPA."""
    rows = 1
    for n in q[:-2]:
        rows *= int(n)
    return 2 * rows * int(q[-2]) * int(k[-2]) * (int(q[-1]) + int(v[-1]))


@dataclass
class Flops:
    counted: int = 0  # everything torch's flop counter booked (GEMMs, convolutions, any attention it knows)
    attention_counted: int = 0  # the part of `counted` booked inside attention calls
    attention_analytic: int = 0  # every attention call by formula
    attention_added: int = 0  # the formula's flops of the calls the counter booked nothing for
    attention_calls: int = 0

    @property
    def total(self) -> int:
        return self.counted + self.attention_added


class _Probe(TorchFunctionMode):
    """Per attention call: its flops by formula against what the counter booked for it.

    Also indexes with a real boolean mask (DeepStack's image-token positions) by the mask's indices: a
    fake tensor cannot tell how many rows a mask selects, the real mask can, and the result is the same.
    """

    def __init__(self, counter: FlopCounterMode, flops: Flops) -> None:
        super().__init__()
        self.counter, self.flops = counter, flops

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and _real_mask(args[1]):
            with unset_fake_temporarily():
                index = args[1].nonzero(as_tuple=True)
            return func(args[0], index, *args[2:], **kwargs)
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        before = self.counter.get_total_flops()
        out = func(*args, **kwargs)
        booked = self.counter.get_total_flops() - before
        q, k, v = (*args, *(kwargs[n] for n in ("query", "key", "value") if n in kwargs))[:3]
        analytic = attention_flops(q.shape, k.shape, v.shape)
        f = self.flops
        f.attention_calls += 1
        f.attention_counted += booked
        f.attention_analytic += analytic
        f.attention_added += analytic if booked == 0 else 0
        return out


def _real_mask(index: object) -> bool:
    return isinstance(index, torch.Tensor) and index.dtype == torch.bool and not isinstance(index, FakeTensor)


class LiveBytes(TorchDispatchMode):
    """Bytes of the live tensor storages made by the ops run in its context (and those given to `track`),
    and their peak: what `torch.cuda.max_memory_allocated` would report, less the allocator's rounding."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.current = self.peak = 0

    def ignore(self, t: torch.Tensor) -> None:
        """Never count `t`'s storage (it lives elsewhere: offloaded weights in host memory)."""
        storage = t.untyped_storage()
        if storage not in self._seen:
            self._seen[storage] = None

    def track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        if storage in self._seen:
            return
        size = storage.nbytes()
        self._seen[storage] = weakref.ref(storage, lambda _, size=size: self._free(size))
        self.current += size
        self.peak = max(self.peak, self.current)

    def _free(self, size: int) -> None:
        self.current -= size

    def reset_peak(self) -> None:
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out


class _Measured:
    """One phase under the flop counter, the attention probe and the memory tracker (in that order above
    `fake`, when given, so that they see each op before the fake mode computes its shapes)."""

    def __init__(self, memory: LiveBytes, fake: FakeTensorMode | None) -> None:
        self.flops = Flops()
        self.counter = FlopCounterMode(display=False)
        self._modes = [m for m in (fake, memory, self.counter, _Probe(self.counter, self.flops)) if m is not None]

    def __enter__(self) -> Flops:
        self._inference = torch.inference_mode()
        self._inference.__enter__()
        for mode in self._modes:
            mode.__enter__()
        return self.flops

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        self._inference.__exit__(*exc)
        self.flops.counted += self.counter.get_total_flops()


class _Reuses(StepCache):
    """A step cache that runs in full until `reusing` is set, then reuses, deciding without reading a value
    (fake tensors have none): what a step that `cache="fast"` reuses computes."""

    reusing = False

    def reuse(self, group: int, probe: torch.Tensor) -> bool:
        return self.reusing and group in self._groups


def named_spec(config: str, workdir: Path) -> tuple[ModelSpec, PromptEncoder]:
    """The spec of a named configuration (demo | full) with the demo tokenizer and image processor."""
    from transformers import Qwen3VLConfig

    from hidream.engine.config import spec_from_config
    from hidream.engine.demo import demo_config, full_config
    from hidream.engine.demo_assets import write_demo_processor_config, write_demo_tokenizer
    from hidream.engine.checkpoint import load_processors as _load_processors

    ids = write_demo_tokenizer(workdir)
    write_demo_processor_config(workdir, patch_size=16, merge_size=2, temporal_patch_size=2)
    raw = full_config(ids) if config == "full" else demo_config(ids, -(-(max(ids.values()) + 1) // 64) * 64)
    spec = spec_from_config(Qwen3VLConfig.from_dict(raw))
    tokenizer, processor = _load_processors(workdir)
    return spec, PromptEncoder(tokenizer, processor, spec.image_token_id)


def checkpoint_spec(checkpoint: Path, tokenizer: str | None = None) -> tuple[ModelSpec, PromptEncoder]:
    """A checkpoint's (directory or single file) spec, tokenizer and image processor; no weight is read."""
    from hidream.engine.checkpoint import open_checkpoint

    ckpt = open_checkpoint(checkpoint, tokenizer=tokenizer)
    tok, processor = ckpt.processors()
    return ckpt.spec, PromptEncoder(tok, processor, ckpt.spec.image_token_id)


def fake_engine(spec: ModelSpec, encoder: PromptEncoder, variant: str, dtype: torch.dtype,
                fake: FakeTensorMode, quantize: str | None = None, offload: str = "none") -> tuple[Engine, int]:
    """An Engine whose weights are fake CPU tensors of `dtype` (the decoder's linears fp8 with `quantize`,
    the decoder layers streamed from "host" tensors with `offload` "layers"), and the parameter count."""
    from hidream.engine.checkpoint import _materialize_buffers
    from hidream.engine.fp8 import quantize_model
    from hidream.engine.model import HiDreamO1

    with torch.device("meta"):
        model = HiDreamO1(spec)
    params = sum(p.numel() for p in model.parameters())
    device = torch.device("cpu")
    model = model.to(dtype)  # still on meta
    with fake:  # Engine() fuses projections: the new Linears must be fake too
        model = model.to_empty(device=device)
        _materialize_buffers(model, device)
        model = model.eval().requires_grad_(False)
        if quantize == "fp8":
            quantize_model(model)
        engine = Engine(model, encoder, variant, Path("fake"), offload=offload, device=device)  # type: ignore[arg-type]
    return engine, params


def _device_tensors(engine: Engine) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(the tensors on the device, those in host memory), as on a CUDA device: embed_tokens stays on the
    host (Engine places it there on CUDA); with offload, so do the layers' host copies and the ViT, and the
    device has the slots."""
    model = engine.model
    embed = model.model.language_model.embed_tokens.weight
    every = [t for t in (*model.parameters(), *model.buffers()) if t is not embed]
    offload = model.offload
    if offload is None:
        return every, [embed]
    host = [t for t in offload.host_tensors() if t is not embed] + [embed]
    slots = [t for slot in offload._slots for t in slot]
    return [t for t in every if t.numel() > 0] + slots, host


def _sampler(scheduler: str, steps: int, shift: float):
    """The recipe's multistep solver (UniPC); Euler stands in for the others (same elementwise cost)."""
    if scheduler == "unipc":
        schedule = unipc_schedule(steps, shift)
        return schedule, UniPCMultistep(schedule)
    schedule = linear_schedule(steps, shift)
    return schedule, EulerFlow(schedule)


def dry_run(spec: ModelSpec, encoder: PromptEncoder, *, variant: str = "full", width: int = 2048,
            height: int = 2048, refs: int = 0, steps: int | None = None, guidance: float | None = None,
            dtype: torch.dtype = torch.bfloat16, tflops: float = DEFAULT_TFLOPS, quantize: str | None = None,
            offload: str = "none") -> dict:
    """Run one request's conditioning and prefill and one denoising step on fake weights; the report."""
    started = time.perf_counter()
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    engine, params = fake_engine(spec, encoder, variant, dtype, fake, quantize, offload)
    recipe = engine.recipe(refs)
    steps = steps or recipe.steps
    guidance = recipe.guidance if guidance is None else guidance
    width, height, sized, for_vit = img.prepare_references(_references(refs), width, height, False,
                                                           field="refs")
    prompts = [PROMPT] + ([UNCONDITIONAL_PROMPT] if guidance > 1.0 else [])

    memory = LiveBytes()
    on_device, on_host = _device_tensors(engine)
    for t in on_host:
        memory.ignore(t)
    for t in on_device:
        memory.track(t)
    weights = memory.current
    host_bytes = sum(t.numel() * t.element_size() for t in on_host)
    # Per request. The conditioning runs without an ambient fake mode: the ViT computes its packing from
    # the real image grid (`.tolist()`), and only the tensors that meet a weight turn fake.
    with _Measured(memory, None) as conditioning:
        cond = engine.conditioning(prompts, width, height, sized, for_vit)
    with _Measured(memory, fake) as prefill:  # ambient: the K/V buffers it allocates are fake too
        denoiser = Denoiser(engine.model, cond, mode="cached", batch=True)
    peak_request, resident = memory.peak, memory.current
    # Per step: the denoising loop itself, stopped after its first step.
    schedule, sampler = _sampler(recipe.scheduler, steps, recipe.shift)
    memory.reset_peak()
    with _Measured(memory, fake) as step:
        z = engine.initial_noise(0, width, height, recipe.noise_scale)
        taken = []
        try:
            denoise(denoiser, z, schedule, sampler, guidance,
                    progress=lambda i, n, _: taken.append(i), should_cancel=lambda: bool(taken))
        except GenerationCanceled:
            pass
    peak_step = memory.peak
    # A step that step caching reuses: two full passes fill the cache (a reused residual is extrapolated from
    # the last two), then the measured reused one.
    before_cache = memory.current
    with _Measured(memory, fake):
        cache = _Reuses(POLICIES["fast"])
        t = torch.tensor(0.5)
        for i in range(2):
            cache.begin(i, steps)
            denoiser(z, t, cache=cache)
    cache_bytes = memory.current - before_cache
    cache.reusing = True
    cache.begin(2, steps)
    with _Measured(memory, fake) as reused_step:
        denoiser(z, t, cache=cache)
    del cache
    per_request = Flops(**{k: getattr(conditioning, k) + getattr(prefill, k) for k in asdict(conditioning)})

    flops_per_image = steps * step.total + per_request.total
    branches = cond.branches
    return {
        "estimate": ESTIMATE,
        "tensors": f"fake CPU tensors in {str(dtype).replace('torch.', '')} (this torch has no CUDA device; "
                   f"sizes are those of CUDA tensors, less the allocator's 512-byte rounding)",
        "size": f"{width}x{height}",
        "references": refs,
        "weights": f"{str(dtype).replace('torch.', '')}" + (", decoder linears fp8" if quantize else ""),
        "offload": offload,
        "steps": steps,
        "guidance": guidance,
        "branches": len(prompts),
        "tokens": {
            "text": [int(b.input_ids.shape[1]) for b in branches],
            "generation": int(branches[0].gen_positions.shape[2]),  # timestep token + target + references
            "target": cond.target_len,
        },
        "params": params,
        "flops_per_step": step.total,
        "step": asdict(step),
        "prefill_flops": per_request.total,
        # cache="fast": what a reused step's model pass computes, and the residuals the cache keeps
        "cache": {"flops_per_reused_step": reused_step.total, "residual_bytes": cache_bytes},
        "prefill": asdict(per_request),
        "flops_per_image": flops_per_image,
        "tflops": tflops,
        "floor_seconds": flops_per_image / (tflops * 1e12),
        "memory": {
            "weights_bytes": weights,  # on the device
            "host_weights_bytes": host_bytes,  # in host memory (offload)
            "resident_after_prefill_bytes": resident,  # weights + K/V buffers + conditioning
            "peak_prefill_bytes": peak_request,
            "peak_step_bytes": peak_step,
            "peak_bytes": max(peak_request, peak_step),
        },
        "wall_seconds": time.perf_counter() - started,
    }


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def print_report(report: dict, source: str) -> None:
    r, s, m = report, report["step"], report["memory"]
    tokens = r["tokens"]
    print(f"dry run of {source}: {r['size']}, {r['references']} reference(s), {r['steps']} steps, "
          f"guidance {r['guidance']:g} ({r['branches']} branch(es) batched)")
    print(f"{ESTIMATE}; {r['tensors']}")
    print("| | value |")
    print("|---|---|")
    print(f"| params | {r['params']:.4g} |")
    print(f"| tokens | text {' / '.join(map(str, tokens['text']))}, generation {tokens['generation']} "
          f"(target {tokens['target']}) |")
    print(f"| flops per step | {r['flops_per_step']:.4g} |")
    print(f"| ... counted by torch | {s['counted']:.4g} (of which attention {s['attention_counted']:.4g}) |")
    print(f"| ... attention by formula | {s['attention_analytic']:.4g} ({s['attention_calls']} calls; "
          f"added {s['attention_added']:.4g}) |")
    print(f"| prefill flops (once per request) | {r['prefill_flops']:.4g} |")
    c = r["cache"]
    print(f"| a step `cache=\"fast\"` reuses | {c['flops_per_reused_step']:.4g} flops "
          f"({c['flops_per_reused_step'] / r['flops_per_step']:.1%} of a full step); residuals kept "
          f"{_gib(c['residual_bytes'])} |")
    print(f"| flops per image | {r['flops_per_image']:.4g} |")
    print(f"| floor at {r['tflops']:g} TFLOP/s | {r['floor_seconds']:.2f} s |")
    print(f"| weights | {r['weights']}; offload {r['offload']} |")
    print(f"| peak device memory | {_gib(m['peak_bytes'])} = {m['peak_bytes'] / 1e9:.2f} GB "
          f"(weights {_gib(m['weights_bytes'])}, "
          f"after prefill {_gib(m['resident_after_prefill_bytes'])}, step {_gib(m['peak_step_bytes'])}) |")
    if m["host_weights_bytes"]:
        print(f"| host memory (offloaded weights) | {_gib(m['host_weights_bytes'])} |")
    print(f"dry run took {r['wall_seconds']:.1f} s")


# The settings and requests `--memory-table` estimates: (weights, offload) x (mode, references).
SETTINGS = (("bf16", "none"), ("bf16", "layers"), ("fp8", "none"), ("fp8", "layers"))
MODES = (("text-to-image", 0), ("edit", 1), ("10 references", 10))
DEFAULT_PCIE_GBPS = 25.0  # PCIe 4.0 x16 as host-to-device copies reach it from pinned memory


def layer_stream_bytes(report: dict, params_per_layer: int, layers: int) -> int:
    """Bytes one pass over the offloaded decoder layers copies: every layer's weights, fp8 or bf16."""
    per = 1 if "fp8" in report["weights"] else 2
    return layers * params_per_layer * per


def seconds_per_image(report: dict, pass_bytes: int, pcie_gbps: float) -> float:
    """The floor: each step takes its flops at `tflops`, or with offload at least one pass of layer copies
    (they overlap the compute); the prefill's two passes (one per branch) likewise."""
    step = report["flops_per_step"] / (report["tflops"] * 1e12)
    prefill = report["prefill_flops"] / (report["tflops"] * 1e12)
    if report["offload"] == "layers":
        copy = pass_bytes / (pcie_gbps * 1e9)
        step, prefill = max(step, copy), max(prefill, report["branches"] * copy)
    return report["steps"] * step + prefill


def memory_table(spec: ModelSpec, encoder: PromptEncoder, *, variant: str, width: int, height: int,
                 tflops: float, pcie_gbps: float) -> list[dict]:
    """One dry run per setting and mode: peak device memory, host memory, and the seconds floor."""
    per_layer, rows = _params_per_layer(spec), []
    for weights, offload in SETTINGS:
        for mode, refs in MODES:
            r = dry_run(spec, encoder, variant=variant, width=width, height=height, refs=refs, tflops=tflops,
                        quantize="fp8" if weights == "fp8" else None, offload=offload)
            pass_bytes = layer_stream_bytes(r, per_layer, spec.text.num_hidden_layers)
            rows.append({"weights": weights, "offload": offload, "mode": mode, "references": refs,
                         "peak_bytes": r["memory"]["peak_bytes"], "weights_bytes": r["memory"]["weights_bytes"],
                         "host_bytes": r["memory"]["host_weights_bytes"], "steps": r["steps"],
                         "floor_seconds": seconds_per_image(r, pass_bytes, pcie_gbps),
                         "compute_floor_seconds": r["floor_seconds"], "pass_bytes": pass_bytes,
                         "flops_per_step": r["flops_per_step"], "prefill_flops": r["prefill_flops"],
                         "branches": r["branches"]})
    return rows


def _params_per_layer(spec: ModelSpec) -> int:
    from hidream.engine.model import DecoderLayer

    with torch.device("meta"):
        layer = DecoderLayer(spec)
    return sum(p.numel() for name, p in layer.named_parameters() if "norm" not in name)


def print_table(rows: list[dict], source: str, size: str, tflops: float, pcie_gbps: float) -> None:
    print(f"peak device memory of {source} at {size}, per weights and offload setting ({ESTIMATE}); seconds per "
          f"image: the floor at {tflops:g} TFLOP/s with layer copies at {pcie_gbps:g} GB/s overlapping compute")
    print("| weights | offload | mode | peak device memory | weights on the device | host memory | "
          "floor s/image |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['weights']} | {r['offload']} | {r['mode']} | {r['peak_bytes'] / 1e9:.2f} GB | "
              f"{r['weights_bytes'] / 1e9:.2f} GB | {r['host_bytes'] / 1e9:.2f} GB | {r['floor_seconds']:.1f} |")


def run_dry_run(args: argparse.Namespace) -> int:
    from hidream.cli import _dtype, resolve_model
    from hidream.engine.config import detect_variant
    from hidream.sizes import resolve_size

    width, height = resolve_size(args.size, "--size")
    with tempfile.TemporaryDirectory() as tmp:
        if args.config:
            spec, encoder = named_spec(args.config, Path(tmp))
            variant, source = args.variant or "full", f"the {args.config} configuration"
        else:
            checkpoint, _ = resolve_model(args.model)
            spec, encoder = checkpoint_spec(checkpoint, getattr(args, "tokenizer", None))
            variant, source = args.variant or detect_variant(checkpoint), f"the configuration of {checkpoint}"
        if args.memory_table:
            pcie = args.pcie_gbps or DEFAULT_PCIE_GBPS
            rows = memory_table(spec, encoder, variant=variant, width=width, height=height, tflops=args.tflops,
                                pcie_gbps=pcie)
            print_table(rows, source, f"{width}x{height}", args.tflops, pcie)
            if args.json:
                Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
            return 0
        quantize = args.quantize
        report = dry_run(spec, encoder, variant=variant, width=width, height=height, refs=args.refs,
                         steps=args.steps, guidance=args.guidance, dtype=_dtype(args.dtype) or torch.bfloat16,
                         tflops=args.tflops, quantize=None if quantize in (None, "none") else quantize,
                         offload=args.offload or "none")
    report["source"] = source
    print_report(report, source)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0
