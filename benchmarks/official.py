"""Side by side with the official HiDream-O1-Image code: the same checkpoint, cases, seed and threads.

    .venv/bin/python benchmarks/official.py --official-src DIR --official-python PY [--threads 1] [--steps 3]

DIR is a checkout of github.com/HiDream-ai/HiDream-O1-Image that the user provides (never vendored here),
PY a Python whose environment runs it (torch, torchvision, transformers 4.57.1, diffusers, einops). The two
programs need different environments, so each side is a long-lived worker process of this same script,
which loads its model once per checkpoint; this process sends them the cases one at a time, alternating,
and never two at once. It prints, per case, the official/ours ratio of seconds per image (CPU time and
wall time of the worker process) and of peak memory (the worker's peak resident set, reset before each
case), and the largest difference between the two uint8 images.

The official code is made to run on the CPU at run time, inside its worker, as docs/parity.md describes:
its flash-attention function becomes SDPA doing the same two passes; its hard-coded timestep-token id
becomes the checkpoint tokenizer's; and for float32 its hard-coded bf16 (casts and autocast) becomes the
run's dtype. No file of the checkout is changed.

The checkpoints: `demo` (what `hidream demo-model` writes) and `scaled`, the demo layout with a
wider decoder (hidden 512, 8 layers, 8 attention heads, 4 key/value heads, head_dim 64), random weights;
and `full`, the published 8B shape with random bf16 weights (~16.4 GB in ~2 GB shards, made on --device).

On a GPU (benchmarks/gpu.sh's last step):

    official.py --official-src DIR --official-python PY --device cuda --checkpoints full \
        --size 2048x2048 --steps 50 --guidance 5 --json FILE

bf16 by default; the official code keeps its own bf16 and autocast, and its flash-attention function where
flash-attn is installed (else SDPA, as on the CPU). The figures are wall seconds per image and per step (the
median of per-step times, each side waiting for the device after every step) and the peak of
torch.cuda.max_memory_allocated, reset per case in each side's process. If the official code does not
import under PY, one line says why and the exit code is 1, before any checkpoint is written.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

PROMPT = ("medium shot, eye-level, front view. A woman is seated in an ornate bedroom, illuminated by candlelight, "
          "with a calm and composed expression. She wears a cream-colored satin robe with delicate floral "
          "embroidery. To her left, a wooden nightstand holds three lit white candles.")
SEED = 42
GUIDANCE = 5.0

# Every target is a native size of the official code (its PREDEFINED_RESOLUTIONS, about 2048² in area),
# so its resolution snapping leaves it alone. refs: the source images' (width, height), written once.
CASES: dict[str, dict] = {
    "t2i": {"width": 2048, "height": 2048, "refs": [], "keep_original_aspect": False, "shift": 3.0,
            "label": "text-to-image"},
    "refs3": {"width": 2048, "height": 2048, "refs": [(1024, 768), (768, 1024), (1024, 1024)],
              "keep_original_aspect": False, "shift": 1.0, "label": "3 references"},
    "edit_keep": {"width": 2048, "height": 2048, "refs": [(1344, 1728)], "keep_original_aspect": True,
                  "shift": 3.0, "label": "edit, keep_original_aspect"},
    # Layout boxes (ours [x1, y1, x2, y2]; the official code is given [x1, x2, y1, y2]): two references and the
    # layout image, a personalization of 3 conditioning images.
    "layout": {"width": 2048, "height": 2048, "refs": [(1024, 768), (768, 1024)], "keep_original_aspect": False,
               "shift": 1.0, "label": "layout boxes, 2 references",
               "layout": [(0.05, 0.1, 0.5, 0.9), (0.55, 0.25, 0.95, 0.75)]},
}
# Each worker's first request, not measured: the run's first case for one step (both guidance branches),
# so that the first measured case does not pay for first-use costs (lazy imports, kernel selection). Not a
# larger one: the engine keeps freed memory for reuse (glibc tuned at load), so a large warm-up would
# set its peak for every smaller case. The cases run from the smallest sequence to the largest.
WARMUP_STEPS = 1
# glibc settings that the engine applies to its own process at load (hidream.engine.host), for
# --official-malloc-like-ours: freed large blocks kept for reuse rather than returned and faulted in again.
OURS_MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1), "MALLOC_TOP_PAD_": str(64 << 20)}

# The scaled checkpoint's decoder. intermediate_size is 3x hidden, as in the published model.
SCALED_TEXT = {"hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 4,
               "head_dim": 64, "intermediate_size": 1536,
               "rope_scaling": {"mrope_interleaved": True, "mrope_section": [12, 10, 10], "rope_type": "default"}}
PATCH_DIM = 3 * 32 * 32
TIMESTEP_FREQ_DIM = 256


# --- checkpoints ----------------------------------------------------------------------------------


def scaled_config(token_ids: dict[str, int], vocab_size: int, text: dict | None = None) -> dict:
    """config.json of the scaled checkpoint: the demo one with the decoder of `text` (SCALED_TEXT)."""
    from hidream.engine.demo import demo_config

    text = dict(SCALED_TEXT if text is None else text)
    raw = demo_config(token_ids, vocab_size, layers=text["num_hidden_layers"], hidden=text["hidden_size"])
    raw["text_config"].update(text)
    raw["vision_config"]["out_hidden_size"] = text["hidden_size"]
    return raw


def official_shapes(raw: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of the official layout for a config.json: Qwen3-VL's own modules (their names and shapes
    from transformers, on the meta device) under `model.`, plus HiDream-O1's patch, timestep and output heads."""
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLModel

    with torch.device("meta"):
        base = Qwen3VLModel(Qwen3VLConfig.from_dict(copy.deepcopy(raw)))  # from_dict changes its dict
    shapes = {f"model.{k}": tuple(v.shape) for k, v in base.state_dict().items()}
    hidden, vocab = raw["text_config"]["hidden_size"], raw["text_config"]["vocab_size"]
    shapes.update({
        "model.t_embedder1.mlp.0.weight": (hidden, TIMESTEP_FREQ_DIM), "model.t_embedder1.mlp.0.bias": (hidden,),
        "model.t_embedder1.mlp.2.weight": (hidden, hidden), "model.t_embedder1.mlp.2.bias": (hidden,),
        "model.x_embedder.proj1.weight": (hidden // 4, PATCH_DIM),
        "model.x_embedder.proj2.weight": (hidden, hidden // 4), "model.x_embedder.proj2.bias": (hidden,),
        "model.final_layer2.linear.weight": (PATCH_DIM, hidden), "model.final_layer2.linear.bias": (PATCH_DIM,),
        "lm_head.weight": (vocab, hidden),
    })
    return shapes


def _random_tensor(name: str, shape: tuple[int, ...], gen, device):
    """Norm weights 1, biases 0; every other tensor normal with std 1/sqrt(fan_in), except the output head
    (std 0.02, as in the demo checkpoint, so the random x0 stays near the pixel range). bf16."""
    import torch

    if name.endswith(".bias"):
        t = torch.zeros(shape, device=device)
    elif "norm" in name.rsplit(".", 2)[-2] and name.endswith(".weight"):
        t = torch.ones(shape, device=device)
    else:
        fan_in = 1
        for d in shape[1:]:
            fan_in *= d
        std = 0.02 if name == "model.final_layer2.linear.weight" else fan_in ** -0.5
        t = torch.randn(shape, generator=gen, device=device) * std
    return t.to(torch.bfloat16).contiguous()


def write_random_weights(raw: dict, out: Path, seed: int = 0, device: str = "cpu",
                         shard_bytes: int | None = None) -> None:
    """The official layout's tensors for config.json `raw`, random (see _random_tensor), made on `device`
    with a seeded generator, into model.safetensors, or shards of about `shard_bytes` with an index (each
    shard moved to the CPU and written before the next is made, so host memory stays about one shard)."""
    import torch
    from safetensors.torch import save_file

    shapes = sorted(official_shapes(raw).items())
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in shapes:
        nbytes = 2 * math.prod(shape)
        if shard_bytes and groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += nbytes
    for old in out.glob("model*.safetensors*"):
        old.unlink()
    gen = torch.Generator(device).manual_seed(seed)
    meta = {"format": "pt"}
    weight_map, total = {}, 0
    for i, group in enumerate(groups, start=1):
        tensors = {name: _random_tensor(name, shape, gen, device).cpu() for name, shape in group}
        file = "model.safetensors" if len(groups) == 1 else f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file(tensors, str(out / file), metadata=meta)
        weight_map.update({k: file for k in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    if len(groups) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def write_scaled_checkpoint(directory: str | Path, seed: int = 0, text: dict | None = None) -> Path:
    """Write the scaled checkpoint (official layout, random bf16 weights) into `directory` and return it."""
    from hidream.engine.demo import VISION
    from hidream.engine.demo_assets import write_demo_processor_config, write_demo_tokenizer

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    token_ids = write_demo_tokenizer(out)
    vocab_size = -(-(max(token_ids.values()) + 1) // 64) * 64
    raw = scaled_config(token_ids, vocab_size, text)
    write_demo_processor_config(out, patch_size=VISION["patch_size"], merge_size=VISION["spatial_merge_size"],
                                temporal_patch_size=VISION["temporal_patch_size"])
    write_random_weights(raw, out, seed)
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")  # last: complete
    return out


def write_full_checkpoint(directory: str | Path, seed: int = 0, device: str = "cpu", shard_bytes: int = 2 << 30,
                          _text: dict | None = None, _vision: dict | None = None) -> Path:
    """Write the full checkpoint: the published 8B shape (hidream.engine.demo.full_config, the demo tokenizer
    and processor files), random bf16 weights made on `device` (fast on a GPU), in shards of ~2 GB.

    _text/_vision: overrides of the config's text/vision parts, for tests (a tiny model of the same layout).
    """
    from hidream.engine.demo import VISION, full_config
    from hidream.engine.demo_assets import write_demo_processor_config, write_demo_tokenizer

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    raw = full_config(write_demo_tokenizer(out))
    raw["text_config"].update(_text or {})
    raw["vision_config"].update(_vision or {})
    raw["vision_config"]["out_hidden_size"] = raw["text_config"]["hidden_size"]
    write_demo_processor_config(out, patch_size=VISION["patch_size"], merge_size=VISION["spatial_merge_size"],
                                temporal_patch_size=VISION["temporal_patch_size"])
    write_random_weights(raw, out, seed, device, shard_bytes)
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")  # last: complete
    return out


def write_checkpoint(kind: str, directory: Path, device: str = "cpu") -> Path:
    """Write checkpoint `kind` into `directory`; complete only once its config.json is there (written last)."""
    if kind == "demo":
        from hidream.engine.demo import write_demo_checkpoint

        path = write_demo_checkpoint(directory, seed=0)
    elif kind == "full":
        path = write_full_checkpoint(directory, seed=0, device=device)
    else:
        path = write_scaled_checkpoint(directory, seed=0)
    return path


def write_references(directory: Path) -> dict[tuple[int, int], Path]:
    """One PNG per source size the cases use: smooth colour ramps with noise, the same bytes every run."""
    import numpy as np
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = {}
    for i, (w, h) in enumerate(sorted({s for case in CASES.values() for s in case["refs"]})):
        y, x = np.mgrid[0:h, 0:w]
        ramp = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h) + 64 * i], axis=-1)
        pixels = np.clip(ramp + rng.normal(0, 24, (h, w, 3)), 0, 255).astype(np.uint8)
        path = directory / f"ref-{w}x{h}.png"
        Image.fromarray(pixels).save(path)
        paths[(w, h)] = path
    return paths


# --- workers: one process per side and checkpoint, a JSON line in and out per case ----------------


def _peak_reset() -> None:
    try:  # resets the process's peak resident set (VmHWM) to its current one, on Linux
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _measure(run, device: str = "cpu") -> tuple[object, dict]:
    """Run `run()` and measure it. On CUDA also the peak of torch.cuda.max_memory_allocated (reset first)
    and the memory allocated when the case started (gpu_peak_bytes, gpu_before_bytes)."""
    import gc
    import resource

    gc.collect()
    gpu = {}
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        gpu["gpu_before_bytes"] = torch.cuda.memory_allocated()
    _peak_reset()
    rss_before = _status_kib("VmRSS")
    usage, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    image = run()
    if device == "cuda":
        torch.cuda.synchronize()
        gpu["gpu_peak_bytes"] = torch.cuda.max_memory_allocated()
    wall, after = time.perf_counter() - wall, resource.getrusage(resource.RUSAGE_SELF)
    user, system = after.ru_utime - usage.ru_utime, after.ru_stime - usage.ru_stime
    return image, {**gpu, "cpu_s": user + system, "user_s": user, "sys_s": system, "wall_s": wall,
                   "peak_bytes": _status_kib("VmHWM") * 1024, "rss_before_bytes": rss_before * 1024,
                   "major_faults": after.ru_majflt - usage.ru_majflt, "minor_faults": after.ru_minflt - usage.ru_minflt}


class _OursSide:
    """Our engine, through its public API only."""

    def __init__(self, checkpoint: Path, dtype, device: str = "cpu") -> None:
        from hidream.engine.pipeline import Engine

        self.device, self.step_seconds = device, []
        self.engine = Engine.load(checkpoint, device=device, dtype=dtype)

    def generate(self, case: dict):
        from hidream.engine.pipeline import GenerationRequest

        req = GenerationRequest(case["prompt"], width=case["width"], height=case["height"],
                                references=list(case["ref_paths"]),
                                keep_original_aspect=case["keep_original_aspect"], steps=case["steps"],
                                guidance=case["guidance"], shift=case["shift"], seed=case["seed"],
                                scheduler="unipc", layout=case.get("layout"))
        # Per-step times (the engine waits for the device after each step) only on CUDA: the CPU figures
        # stay those of a plain run.
        result = self.engine.generate(req, mode="cached", timings=self.device == "cuda")
        self.step_seconds = list(result.step_seconds)
        return result.images[0]

    @staticmethod
    def versions() -> dict:
        import torch
        import transformers

        import hidream

        return {"torch": torch.__version__, "transformers": transformers.__version__,
                "hidream": str(Path(hidream.__file__).parent)}


def official_boxes(layout: list | None) -> str | None:
    """Our [x1, y1, x2, y2] boxes as the official code's layout_bboxes: JSON text of [x1, x2, y1, y2] boxes."""
    if not layout:
        return None
    return json.dumps([[x1, x2, y1, y2] for x1, y1, x2, y2 in layout])


class _DtypeTorch:
    """The `torch` module as the official pipeline sees it: its hard-coded bf16 is the run's dtype, and
    autocast (bf16 on CUDA in the official code) does nothing in a float32 run."""

    def __init__(self, torch, dtype) -> None:
        self._torch, self.bfloat16 = torch, dtype
        if dtype == torch.float32:
            import contextlib

            self.autocast = lambda *args, **kwargs: contextlib.nullcontext()

    def __getattr__(self, name: str):
        return getattr(self._torch, name)


def _sdpa_as_flash(q, k, v, softmax_scale=None, causal=False):
    """flash_attn_func's contract on SDPA: [B, S, H, D] in and out, grouped key/value heads, no mask."""
    import torch.nn.functional as F

    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=causal, scale=softmax_scale, enable_gqa=k.shape[2] != q.shape[2])
    return out.transpose(1, 2)


class _StepClock:
    """The `tqdm` module as the official pipeline sees it: its step loop's iterator, timed per step (waiting
    for the device before each tick). Its only use of tqdm is that loop."""

    def __init__(self, device: str) -> None:
        self.device, self.step_seconds = device, []

    def tqdm(self, iterable, **_):
        import torch

        def ticks():
            self.step_seconds = []
            for item in iterable:
                if self.device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                yield item
                if self.device == "cuda":
                    torch.cuda.synchronize()
                self.step_seconds.append(time.perf_counter() - start)

        return ticks()


class _OfficialSide:
    """The official pipeline from a checkout, patched at run time (see the module docstring). On CUDA in
    bf16 its own dtype handling and autocast stay as they are, and so does its flash-attention function
    when flash-attn is installed; otherwise that becomes SDPA."""

    def __init__(self, checkpoint: Path, dtype, source: Path, device: str = "cpu") -> None:
        import torch

        sys.path.insert(0, str(source))
        import inference
        import models.pipeline as pipeline
        import models.qwen3_vl_transformers as qwen
        from transformers import AutoProcessor

        if device == "cpu" or dtype != torch.bfloat16 or qwen._flash_attn_func is None:
            qwen._flash_attn_func = _sdpa_as_flash
        if dtype != torch.bfloat16:  # (for bf16 _DtypeTorch would change nothing)
            qwen.torch = _DtypeTorch(torch, dtype)  # the q/k/v casts before its flash calls
            pipeline.torch = _DtypeTorch(torch, dtype)  # its dtype, noise, reference patches and autocast
        self.clock = pipeline.tqdm = _StepClock(device)
        self.attention = "flash-attn" if qwen._flash_attn_func is not _sdpa_as_flash else "SDPA"
        self.generate_image = pipeline.generate_image
        self.processor = AutoProcessor.from_pretrained(str(checkpoint))
        tokenizer = inference.get_tokenizer(self.processor)
        inference.add_special_tokens(tokenizer)
        placement = {"device_map": device} if device != "cpu" else {}
        model, info = qwen.Qwen3VLForConditionalGeneration.from_pretrained(
            str(checkpoint), dtype=dtype, output_loading_info=True, **placement)
        problems = {k: v for k, v in info.items() if v}
        if problems:
            raise RuntimeError(f"the official model did not load {checkpoint} cleanly: {problems}")
        model.model.tms_token_id = tokenizer.convert_tokens_to_ids("<|tms_token|>")  # 151673 in the code
        self.model = model.eval()

    @property
    def step_seconds(self) -> list[float]:
        return self.clock.step_seconds

    def generate(self, case: dict):
        return self.generate_image(
            model=self.model, processor=self.processor, prompt=case["prompt"], ref_image_paths=list(case["ref_paths"]),
            height=case["height"], width=case["width"], num_inference_steps=case["steps"],
            guidance_scale=case["guidance"], shift=case["shift"], scheduler_name="default", seed=case["seed"],
            keep_original_aspect=case["keep_original_aspect"], layout_bboxes=official_boxes(case.get("layout")))

    @staticmethod
    def versions() -> dict:
        import diffusers
        import torch
        import transformers

        return {"torch": torch.__version__, "transformers": transformers.__version__,
                "diffusers": diffusers.__version__}

    def describe(self) -> dict:
        return {"attention": self.attention}


def kernel_check() -> dict:
    """CPU seconds of a matmul and an SDPA of the scaled decoder's width over 4096 tokens: the torch builds compared."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(4096, 512, generator=gen), torch.randn(512, 1536, generator=gen)
    q = torch.randn(1, 8, 4096, 64, generator=gen)
    kv = torch.randn(1, 4, 4096, 64, generator=gen)
    figures = {}
    for name, op in (("matmul_s", lambda: a @ b),
                     ("sdpa_s", lambda: F.scaled_dot_product_attention(q, kv, kv, enable_gqa=True))):
        op()
        t = time.process_time()
        for _ in range(3):
            op()
        figures[name] = (time.process_time() - t) / 3
    return figures


def run_worker(args: argparse.Namespace) -> int:
    """Serve cases on stdin, one JSON line each; answer on the original stdout, everything else to stderr."""
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # prints, progress bars and warnings of either program go to stderr
    sys.stdout = sys.stderr
    import torch

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    started = time.perf_counter()
    try:
        if args.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"--device cuda: torch {torch.__version__} here sees no CUDA device")
        if args.worker == "ours":
            side = _OursSide(Path(args.checkpoint), dtype, args.device)
        else:
            side = _OfficialSide(Path(args.checkpoint), dtype, Path(args.official_src), args.device)
    except Exception:
        traceback.print_exc()
        replies.write(json.dumps({"error": traceback.format_exc()}) + "\n")
        return 1
    extra = side.describe() if hasattr(side, "describe") else {}
    if args.device == "cuda":
        extra["gpu"] = torch.cuda.get_device_name()
    replies.write(json.dumps({"ready": True, "load_s": time.perf_counter() - started,
                              "threads": torch.get_num_threads(), **side.versions(), **extra,
                              "kernels": kernel_check()}) + "\n")
    for line in sys.stdin:
        case = json.loads(line)
        if case.get("quit"):
            break
        try:
            image, figures = _measure(lambda case=case: side.generate(case), args.device)
            image.save(case["out"])
            steps = list(side.step_seconds)
            if steps:
                figures |= {"step_seconds": steps, "step_median_s": statistics.median(steps)}
            replies.write(json.dumps({**figures, "width": image.width, "height": image.height}) + "\n")
        except Exception:
            traceback.print_exc()
            replies.write(json.dumps({"error": traceback.format_exc()}) + "\n")
    return 0


class WorkerError(RuntimeError):
    """A worker's failure: its traceback (also in the workers' log), and a one-line summary."""

    def __init__(self, side: str, trace: str) -> None:
        lines = [line for line in trace.strip().splitlines() if line.strip()]
        self.side, self.trace, self.summary = side, trace, lines[-1].strip() if lines else "unknown error"
        super().__init__(f"the {side} worker failed: {self.summary}")


class Worker:
    """A worker process of this script, driven one case at a time."""

    def __init__(self, side: str, python: str, checkpoint: Path, args: argparse.Namespace, log,
                 warmup: dict, pythonpath: Path | None = None) -> None:
        cmd = [python, str(Path(__file__).resolve()), "--worker", side, "--checkpoint", str(checkpoint),
               "--threads", str(args.threads), "--dtype", args.dtype, "--device", args.device]
        if side == "official":
            cmd += ["--official-src", str(args.official_src)]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
                   TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   TQDM_DISABLE="1")
        if side == "official" and args.official_malloc_like_ours:
            env.update(OURS_MALLOC_ENV)
        if pythonpath is not None:  # ahead of the editable install's .pth entry
            env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), *filter(None, [env.get("PYTHONPATH")])])
        self.side = side
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                     text=True, env=env)
        self.info = self._reply()
        self.info["warmup"] = self.run(warmup)

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.side} worker exited (code {self.proc.wait()}); see its log")
        reply = json.loads(line)
        if "error" in reply:
            raise WorkerError(self.side, reply["error"])
        return reply

    def run(self, case: dict) -> dict:
        self.proc.stdin.write(json.dumps(case) + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"quit": True}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


# --- the driver -----------------------------------------------------------------------------------


def image_diff(a: Path, b: Path) -> dict:
    import numpy as np
    from PIL import Image

    x = np.asarray(Image.open(a).convert("RGB"), dtype=np.int16)
    y = np.asarray(Image.open(b).convert("RGB"), dtype=np.int16)
    if x.shape != y.shape:
        return {"max_abs_diff": None, "mean_abs_diff": None, "shapes": [list(x.shape), list(y.shape)]}
    d = np.abs(x - y)
    return {"max_abs_diff": int(d.max()), "mean_abs_diff": float(d.mean())}




ROOT = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True).stdout


def engine_source(rev: str | None, workdir: Path) -> tuple[Path | None, str]:
    """Where our worker imports hidream from, and which engine that is: the working tree (None), or
    `rev`'s src/ exported into workdir with `git archive`."""
    try:
        if rev is None:
            head = _git("rev-parse", "--short", "HEAD").strip()
            dirty = _git("status", "--porcelain", "--", "src/hidream").strip()
            return None, f"{head}" + (" + uncommitted changes in src/hidream" if dirty else "")
        commit = _git("rev-parse", "--short", f"{rev}^{{commit}}").strip()
    except (OSError, subprocess.CalledProcessError) as err:
        if rev is None:
            return None, "unknown"
        sys.exit(f"--ours-commit {rev}: not a commit of {ROOT} ({err})")
    dest = workdir / f"engine-{commit}"
    if not (dest / "src" / "hidream").is_dir():
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "src"], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest / "src", commit


FIGURES = ("cpu_s", "user_s", "sys_s", "wall_s", "peak_bytes", "rss_before_bytes", "minor_faults")
GPU_FIGURES = ("gpu_peak_bytes", "gpu_before_bytes", "step_median_s")


def run_cases(args: argparse.Namespace) -> dict[str, dict]:
    """The cases of this run, in order: with --size, one text-to-image case at that size; else --cases."""
    if args.size is None:
        return {name: CASES[name] for name in args.cases}
    width, height = args.size
    return {"t2i": dict(CASES["t2i"], width=width, height=height)}


def case_request(name: str, steps: int, refs: dict, guidance: float = GUIDANCE,
                 cases: dict[str, dict] = CASES) -> dict:
    """What a worker gets for a case: the request, in the terms both sides take."""
    spec = cases[name]
    return {"prompt": PROMPT, "seed": SEED, "guidance": guidance, "steps": steps,
            "width": spec["width"], "height": spec["height"], "shift": spec["shift"],
            "keep_original_aspect": spec["keep_original_aspect"], "ref_paths": [str(refs[s]) for s in spec["refs"]],
            **({"layout": [list(box) for box in spec["layout"]]} if spec.get("layout") else {})}


def run_checkpoint(kind: str, checkpoint: Path, refs: dict, args: argparse.Namespace, workdir: Path,
                   log, ours_path: Path | None) -> tuple[dict, list[dict]]:
    sides = {}
    cases = run_cases(args)
    try:
        for side, python in (("official", args.official_python), ("ours", sys.executable)):
            t = time.perf_counter()
            warmup = case_request(next(iter(cases)), WARMUP_STEPS, refs, args.guidance, cases) | {
                "out": str(workdir / f"{kind}-warmup-{side}.png")}
            sides[side] = Worker(side, python, checkpoint, args, log, warmup, ours_path if side == "ours" else None)
            print(f"[{kind}] {side} worker ready in {time.perf_counter() - t:.1f} s "
                  f"({', '.join(f'{k} {v}' for k, v in sides[side].info.items() if k not in ('ready', 'load_s', 'kernels', 'warmup'))}; "
                  f"kernel check: {', '.join(f'{k} {v:.3f}' for k, v in sides[side].info['kernels'].items())}; "
                  f"warm-up {sides[side].info['warmup']['cpu_s']:.1f} s CPU, "
                  f"{sides[side].info['warmup']['wall_s']:.1f} s wall)",
                  file=sys.stderr, flush=True)
        rows = []
        for ci, name in enumerate(cases):
            spec = cases[name]
            case = case_request(name, args.steps, refs, args.guidance, cases)
            runs: dict[str, list[dict]] = {"official": [], "ours": []}
            for r in range(args.repeats):
                order = ("official", "ours") if (ci + r) % 2 == 0 else ("ours", "official")
                for side in order:
                    out = workdir / f"{kind}-{name}-{side}-{r}.png"
                    runs[side].append(sides[side].run({**case, "out": str(out)}) | {"image": str(out)})
                    got = runs[side][-1]
                    gpu = (f", GPU peak {got['gpu_peak_bytes'] / 2**30:.2f} GiB" if "gpu_peak_bytes" in got else "") + (
                        f", median step {got['step_median_s']:.3f} s" if "step_median_s" in got else "")
                    print(f"[{kind}] {name} {side} run {r + 1}: {got['cpu_s']:.2f} s CPU, {got['wall_s']:.2f} s "
                          f"wall, peak {got['peak_bytes'] / 2**30:.2f} GiB{gpu}", file=sys.stderr, flush=True)
            off, our = runs["official"], runs["ours"]
            # Each side's run with the least CPU time (on CUDA: wall time): interference only ever adds.
            best = "wall_s" if args.device == "cuda" else "cpu_s"
            keep = FIGURES + GPU_FIGURES
            row = {"checkpoint": kind, "case": name, "label": spec["label"], "steps": args.steps,
                   "guidance": args.guidance, "device": args.device,
                   "size": f"{our[0]['width']}x{our[0]['height']}",
                   "official_size": f"{off[0]['width']}x{off[0]['height']}",
                   "official": {k: v for k, v in min(off, key=lambda x: x[best]).items() if k in keep},
                   "ours": {k: v for k, v in min(our, key=lambda x: x[best]).items() if k in keep},
                   "runs": runs, **image_diff(Path(off[0]["image"]), Path(our[0]["image"]))}
            o, u = row["official"], row["ours"]
            row["ratio_cpu"] = o["cpu_s"] / u["cpu_s"]
            row["ratio_wall"] = o["wall_s"] / u["wall_s"]
            row["ratio_user"] = o["user_s"] / u["user_s"]
            row["ratio_peak"] = o["peak_bytes"] / u["peak_bytes"]
            if "gpu_peak_bytes" in o and "gpu_peak_bytes" in u:
                row["ratio_gpu_peak"] = o["gpu_peak_bytes"] / u["gpu_peak_bytes"]
            rows.append(row)
        return {side: w.info for side, w in sides.items()}, rows
    finally:
        for w in sides.values():
            w.close()


def _peak(side: dict) -> str:
    """The peak resident set, and in brackets how far it rose over the one the case started with."""
    rise = f" (+{(side['peak_bytes'] - side['rss_before_bytes']) / 2**30:.2f})" if "rss_before_bytes" in side else ""
    return f"{side['peak_bytes'] / 2**30:.2f}{rise}"


def _ratio(official: dict, ours: dict, key: str) -> str:
    return f"{official[key] / ours[key]:.2f}x" if key in official and key in ours else "n/a"


def print_table(rows: list[dict]) -> None:
    """The report's table, in Markdown. `user` is the ratio of user CPU time alone: system time is mostly
    page faults, whose cost on a shared machine varies from run to run."""
    print("| checkpoint | case | size | official s/image CPU (wall) | ours s/image CPU (wall) | official/ours CPU | "
          "user | wall | official peak GiB (rise) | ours peak GiB (rise) | official/ours peak | "
          "images: max / mean abs diff |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        o, u = r["official"], r["ours"]
        diff = "sizes differ" if r["max_abs_diff"] is None else f"{r['max_abs_diff']} / {r['mean_abs_diff']:.4f}"
        size = r["size"] if r.get("official_size", r["size"]) == r["size"] else f"{r['official_size']} / {r['size']}"
        print(f"| {r['checkpoint']} | {r['label']}, {r['steps']} steps | {size} | {o['cpu_s']:.2f} ({o['wall_s']:.2f}) | "
              f"{u['cpu_s']:.2f} ({u['wall_s']:.2f}) | {r['ratio_cpu']:.2f}x | {_ratio(o, u, 'user_s')} | "
              f"{r['ratio_wall']:.2f}x | "
              f"{_peak(o)} | {_peak(u)} | {r['ratio_peak']:.2f}x | {diff} |")


def print_gpu_table(rows: list[dict]) -> None:
    """The table of a CUDA run: wall seconds per image and per step (the median of the per-step times, else
    seconds per image / steps), the peak of torch.cuda.max_memory_allocated per side, and the images' diff."""
    print("| checkpoint | case | size | official s/image | ours s/image | official/ours | official s/step | "
          "ours s/step | official peak GiB | ours peak GiB | official/ours peak | images: max / mean abs diff |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        o, u = r["official"], r["ours"]
        step = {k: v.get("step_median_s", v["wall_s"] / r["steps"]) for k, v in (("o", o), ("u", u))}
        gib = {k: v.get("gpu_peak_bytes", 0) / 2**30 for k, v in (("o", o), ("u", u))}
        diff = "sizes differ" if r["max_abs_diff"] is None else f"{r['max_abs_diff']} / {r['mean_abs_diff']:.4f}"
        print(f"| {r['checkpoint']} | {r['label']}, {r['steps']} steps, guidance {r.get('guidance', GUIDANCE):g} | "
              f"{r['size']} | {o['wall_s']:.2f} | {u['wall_s']:.2f} | {r['ratio_wall']:.2f}x | {step['o']:.3f} | "
              f"{step['u']:.3f} | {gib['o']:.2f} | {gib['u']:.2f} | {r.get('ratio_gpu_peak', float('nan')):.2f}x | "
              f"{diff} |")


def check_official_imports(args: argparse.Namespace) -> str | None:
    """None when the official code imports under --official-python; else the last line of its error."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import torch, inference, models.pipeline; "
            "sys.exit(0 if sys.argv[2] == 'cpu' or torch.cuda.is_available() else 'torch sees no CUDA device')")
    try:
        done = subprocess.run([args.official_python, "-c", code, str(args.official_src), args.device],
                              capture_output=True, text=True, timeout=600,
                              env=dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"))
    except (OSError, subprocess.TimeoutExpired) as err:
        return str(err)
    if done.returncode == 0:
        return None
    lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
    return lines[-1] if lines else f"exit code {done.returncode}"


def run_driver(args: argparse.Namespace) -> int:
    if args.table:
        report = json.loads(Path(args.table).read_text())
        for row in report["rows"]:  # reports written before the user/sys figures were kept per side
            for side in ("official", "ours"):
                best = min(row["runs"][side], key=lambda x: x["cpu_s"])
                row[side] |= {k: best[k] for k in FIGURES if k in best and k not in row[side]}
        (print_gpu_table if report.get("device") == "cuda" else print_table)(report["rows"])
        return 0
    if not args.official_src or not (Path(args.official_src) / "models" / "pipeline.py").is_file():
        sys.exit("--official-src: a checkout of HiDream-ai/HiDream-O1-Image is needed (models/pipeline.py)")
    problem = check_official_imports(args)  # before writing any checkpoint (16 GB for `full`)
    if problem:
        return fail(args, f"official.py: the official code does not import under {args.official_python}: {problem}")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="hidream-official-"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    refs = write_references(workdir / "refs")
    ours_path, engine = engine_source(args.ours_commit, workdir)
    log_path = workdir / "workers.log"
    report = {"machine": platform.processor() or platform.machine(), "threads": args.threads, "dtype": args.dtype,
              "device": args.device, "steps": args.steps, "guidance": args.guidance, "repeats": args.repeats,
              "engine": engine,
              "official_src": str(args.official_src), "official_malloc_like_ours": args.official_malloc_like_ours,
              "workers": {}, "rows": []}
    with log_path.open("a") as log:
        for kind in args.checkpoints:
            checkpoint = workdir / f"{kind}-checkpoint"
            if not (checkpoint / "config.json").is_file():
                t = time.perf_counter()
                write_checkpoint(kind, checkpoint, args.device)
                print(f"[{kind}] checkpoint written to {checkpoint} in {time.perf_counter() - t:.1f} s",
                      file=sys.stderr, flush=True)
            try:
                info, rows = run_checkpoint(kind, checkpoint, refs, args, workdir, log, ours_path)
            except WorkerError as err:
                return fail(args, f"official.py: [{kind}] {err} (traceback in {log_path})")
            report["workers"][kind] = info
            report["rows"] += rows
    report["seconds"] = time.perf_counter() - started
    print(f"engine {report['engine']}; {args.device}, {report['dtype']}, {args.threads} thread(s), {args.steps} steps, "
          f"guidance {args.guidance:g}, seed {SEED}, best of {args.repeats} run(s) per side"
          f"{'; the official process with our malloc settings' if args.official_malloc_like_ours else ''}; "
          f"{report['seconds']:.0f} s in all (images and worker logs in {workdir})")
    (print_gpu_table if args.device == "cuda" else print_table)(report["rows"])
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def fail(args: argparse.Namespace, message: str) -> int:
    """Print `message` (one line), write it to --json as the report's error, and return the exit code 1."""
    print(message, file=sys.stderr, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"error": message, "device": args.device}, indent=2) + "\n")
    return 1


def parse_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected WIDTHxHEIGHT, e.g. 2048x2048") from None
    if width <= 0 or height <= 0 or width % 32 or height % 32:
        raise argparse.ArgumentTypeError(f"{text!r}: width and height must be positive multiples of 32")
    return width, height


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--official-src", help="a checkout of github.com/HiDream-ai/HiDream-O1-Image")
    p.add_argument("--official-python", default=sys.executable,
                   help="the Python of the official code's environment (default: this one)")
    p.add_argument("--ours-commit", metavar="REV", help="run our engine as of this commit (its src/, exported "
                   "with git archive) instead of the working tree's")
    p.add_argument("--checkpoints", nargs="+", choices=("demo", "scaled", "full"), default=["demo", "scaled"],
                   help="full: the published 8B shape with random bf16 weights, ~16.4 GB written to --workdir "
                        "(made on --device; for --device cuda)")
    p.add_argument("--cases", nargs="+", choices=tuple(CASES), default=list(CASES),
                   help="in this order (default: all, smallest sequence first)")
    p.add_argument("--size", type=parse_size, metavar="WxH",
                   help="instead of --cases, one text-to-image case at this size (e.g. 2048x2048)")
    p.add_argument("--guidance", type=float, default=GUIDANCE, help=f"guidance scale (default {GUIDANCE:g})")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="both sides on this device (default cpu); on cuda the figures are wall time and the "
                        "peak of torch.cuda.max_memory_allocated")
    p.add_argument("--official-malloc-like-ours", action="store_true",
                   help="give the official process the glibc malloc settings the engine sets for itself")
    p.add_argument("--steps", type=int, default=3, help="UniPC steps per image (default 3)")
    p.add_argument("--threads", type=int, default=1, help="torch threads on both sides (default 1)")
    p.add_argument("--repeats", type=int, default=1, help="runs per case and side, alternating which goes first; the best is reported")
    p.add_argument("--dtype", choices=("float32", "bfloat16"),
                   help="on both sides (default: float32 on cpu, bfloat16 on cuda)")
    p.add_argument("--workdir", help="checkpoints, reference images, output images and worker logs "
                                     "(default: a new temporary directory; checkpoints in it are reused)")
    p.add_argument("--json", help="also write the full report here")
    p.add_argument("--table", metavar="JSON", help="print the table of a report written by --json, and stop")
    p.add_argument("--worker", choices=("ours", "official"), help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_worker(args) if args.worker else run_driver(args)


if __name__ == "__main__":
    sys.exit(main())
