"""`hidream convert SRC DST`: any checkpoint the engine reads, written as an official directory or one file.

SRC is an official directory or a single `.safetensors` file (bf16, fp32, or fp8 with scales). DST is
a directory in the official layout (config.json, the tokenizer and processor files, the weights in
shards with an index when they exceed `--shard-gb`), or a single file when it ends in `.safetensors`:
the official tensor names, with the config, the variant and the tokenizer files in its metadata, so
it loads with nothing beside it. `--dtype fp8` stores the decoder layers' linear weights in
float8_e4m3fn with a float32 scale per output row (`--fp8-scaling tensor`: one per tensor, with
ComfyUI's `comfy_quant` markers and `_quantization_metadata`); everything else is bf16. Weights
that are fp8 in SRC are copied as they are. Tensors are read and written one at a time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from hidream.engine import singlefile
from hidream.engine.checkpoint import DECODER_LINEAR, INDEX_FILE, QUANT_SUFFIX, Checkpoint, open_checkpoint
from hidream.engine.errors import CheckpointError, InvalidRequestError
from hidream.engine.tensorfile import Entry, read_tensor, write_file

DROPPABLE = {"lm_head": "lm_head.", "deepstack": singlefile.DEEPSTACK}
DTYPES = ("bf16", "fp8")
FP8 = torch.float8_e4m3fn
COMFY_FP8 = json.dumps({"format": "float8_e4m3fn"}).encode()


class Plan:
    """What DST holds: per output tensor its dtype and shape (for the header), and how to make it."""

    def __init__(self, ckpt: Checkpoint, dtype: str, drop: tuple[str, ...], fp8_scaling: str) -> None:
        self.ckpt, self.fp8, self.per_row = ckpt, dtype == "fp8", fp8_scaling == "row"
        dropped = tuple(DROPPABLE[d] for d in drop)
        self.shapes: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        self.fp8_layers: list[str] = []
        sources = {**ckpt.tensors, **ckpt.extra}
        for name in sorted(sources, key=lambda n: (sources[n].file.name, sources[n].start)):
            if name.startswith(dropped):
                continue
            entry, layer = sources[name], name.removesuffix(".weight")
            if self.fp8 and name.endswith(".weight") and (DECODER_LINEAR.match(layer) or layer in ckpt.scales):
                self.shapes[name] = (FP8, entry.shape)
                self.shapes[layer + ".weight_scale"] = (torch.float32, (entry.shape[0],) if self.per_row else ())
                if not self.per_row:
                    self.shapes[layer + QUANT_SUFFIX] = (torch.uint8, (len(COMFY_FP8),))
                self.fp8_layers.append(layer)
            else:
                kept = entry.dtype if not entry.dtype.is_floating_point else torch.bfloat16
                self.shapes[name] = (kept, entry.shape)

    def tensors(self, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """The output tensors `names` (in that order), each read from SRC and converted."""
        ckpt = self.ckpt
        handles: dict[Path, object] = {}
        fp8_pair: dict[str, torch.Tensor] = {}
        try:
            def read(entry: Entry) -> torch.Tensor:
                if entry.file not in handles:
                    handles[entry.file] = open(entry.file, "rb")
                return read_tensor(handles[entry.file], entry)  # type: ignore[arg-type]

            for name in names:
                if name.endswith(QUANT_SUFFIX):
                    yield name, torch.frombuffer(bytearray(COMFY_FP8), dtype=torch.uint8)
                elif name.endswith(".weight_scale"):
                    yield name, fp8_pair.pop(name)
                else:
                    layer = name.removesuffix(".weight")
                    entry = ckpt.tensors.get(name) or ckpt.extra[name]
                    tensor = read(entry)
                    if layer in self.fp8_layers:
                        w8, scale = self._fp8(layer, tensor, read)
                        fp8_pair[layer + ".weight_scale"] = scale
                        yield name, w8
                    elif layer in ckpt.scales:  # fp8 in SRC, bf16 here
                        yield name, self._dequantized(layer, tensor, read).to(torch.bfloat16)
                    else:
                        yield name, tensor.to(self.shapes[name][0])
        finally:
            for f in handles.values():
                f.close()  # type: ignore[attr-defined]

    def _stored_scale(self, layer: str, read) -> torch.Tensor:
        entry = self.ckpt.scales[layer]
        return torch.ones(()) if entry is None else read(entry).float()

    def _dequantized(self, layer: str, w8: torch.Tensor, read) -> torch.Tensor:
        scale = self._stored_scale(layer, read).reshape(-1)
        return w8.float() * (scale[:, None] if scale.numel() > 1 else scale)

    def _fp8(self, layer: str, tensor: torch.Tensor, read) -> tuple[torch.Tensor, torch.Tensor]:
        from hidream.engine.fp8 import quantize_weight

        if layer in self.ckpt.scales:
            scale = self._stored_scale(layer, read).reshape(-1)
            if self.per_row:  # a stored fp8 weight is kept bit for bit; its scale, one per row
                return tensor, scale.expand(tensor.shape[0]).clone() if scale.numel() == 1 else scale
            if scale.numel() == 1:
                return tensor, scale.reshape(())
            tensor = self._dequantized(layer, tensor, read)
        w8, scale = quantize_weight(tensor.float(), per_row=self.per_row)
        return w8, scale.reshape((tensor.shape[0],) if self.per_row else ())


def _config(ckpt: Checkpoint, drop: tuple[str, ...]) -> dict:
    raw = json.loads(json.dumps(ckpt.config))
    if "deepstack" in drop:
        raw["vision_config"]["deepstack_visual_indexes"] = []
    return raw


def _shards(plan: Plan, limit: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name, (dtype, shape) in plan.shapes.items():
        n = torch.empty((), dtype=dtype).element_size() * int(torch.Size(shape).numel())
        if shards[-1] and size + n > limit and not name.endswith((".weight_scale", QUANT_SUFFIX)):
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def convert(src: str | Path, dst: str | Path, dtype: str = "bf16", drop: tuple[str, ...] = (),
            tokenizer: str | Path | None = None, variant: str | None = None, fp8_scaling: str = "row",
            shard_gb: float = 5.0, force: bool = False) -> Path:
    """Write SRC as DST (see the module's docstring); DST is replaced only with `force`."""
    unknown = [d for d in drop if d not in DROPPABLE]
    if unknown:
        raise InvalidRequestError("drop", f"names from {', '.join(DROPPABLE)} (got {unknown[0]!r})")
    if dtype not in DTYPES:
        raise InvalidRequestError("dtype", f"must be bf16 or fp8 (got {dtype!r})")
    if fp8_scaling not in ("row", "tensor"):
        raise InvalidRequestError("fp8_scaling", f"must be row or tensor (got {fp8_scaling!r})")
    dst = Path(dst).expanduser()
    if dst.exists() and not force:
        raise InvalidRequestError("dst", f"{dst} exists: choose another name, or pass --force to replace it")
    ckpt = open_checkpoint(src, tokenizer=tokenizer, variant=variant)  # type: ignore[arg-type]
    if Path(src).expanduser().resolve() == dst.resolve():
        raise InvalidRequestError("dst", "must differ from SRC")
    plan = Plan(ckpt, dtype, drop, fp8_scaling)
    config = _config(ckpt, drop)
    if dst.suffix == ".safetensors":
        metadata = {"format": "pt", singlefile.CONFIG_KEY: json.dumps(config), singlefile.VARIANT_KEY: ckpt.variant,
                    singlefile.FILES_KEY: json.dumps(ckpt.assets)}
        if plan.fp8_layers and not plan.per_row:
            metadata["_quantization_metadata"] = json.dumps(
                {"format_version": "1.0", "layers": {layer: {"format": "float8_e4m3fn"} for layer in plan.fp8_layers}})
        dst.parent.mkdir(parents=True, exist_ok=True)
        write_file(dst, plan.tensors(list(plan.shapes)), plan.shapes, metadata)
        return dst
    partial = dst.with_name(dst.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        shards = _shards(plan, int(shard_gb * 1e9))
        weight_map = {}
        for i, names in enumerate(shards, start=1):
            file = "model.safetensors" if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            write_file(partial / file, plan.tensors(names), {n: plan.shapes[n] for n in names}, {"format": "pt"})
            weight_map.update({n: file for n in names})
        if len(shards) > 1:
            total = sum(torch.empty((), dtype=d).element_size() * int(torch.Size(shape).numel())
                        for d, shape in plan.shapes.values())  # the tensors' bytes, as the official index has it
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (partial / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        (partial / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        for name, text in ckpt.assets.items():
            (partial / name).write_text(text, encoding="utf-8")
        if dst.exists():
            shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
        partial.rename(dst)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return dst


def run(args: argparse.Namespace) -> int:
    """`hidream convert` (its arguments are declared in cli.py, which must not import torch to build)."""
    try:
        out = convert(args.src, args.dst, args.dtype, tuple(args.drop), args.tokenizer, args.variant, args.fp8_scaling,
                      getattr(args, "shard_gb", 5.0), getattr(args, "force", False))
    except CheckpointError as err:
        print(f"error: SRC: {err}", file=sys.stderr)
        return 2
    except InvalidRequestError as err:
        print(f"error: --{err.field.replace('_', '-')}: {err.rule}" if err.field not in ("dst",)
              else f"error: DST: {err.rule}", file=sys.stderr)
        return 2
    size = sum(f.stat().st_size for f in ([out] if out.is_file() else out.glob("*.safetensors")))
    print(f"wrote {out} ({size / 1e9:.2f} GB)")
    return 0
