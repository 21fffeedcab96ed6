"""Loading a checkpoint directory in the official layout, tensor names one to one, no conversion step."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from hidream.engine.config import ModelSpec, load_spec
from hidream.engine.errors import CheckpointError
from hidream.engine.layers import Linear
from hidream.engine.model import HiDreamO1

INDEX_FILE = "model.safetensors.index.json"
# Present in the published checkpoints, not needed to generate images.
IGNORED_PREFIXES = ("lm_head.",)


def weight_files(checkpoint: Path) -> dict[Path, list[str] | None]:
    """The safetensors files to read: {file: tensor names the index assigns to it, or None without an index}."""
    index = checkpoint / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index}: not a valid safetensors index ({err})") from err
        files: dict[Path, list[str] | None] = {}
        for name, file in weight_map.items():
            files.setdefault(checkpoint / file, []).append(name)  # type: ignore[union-attr]
        for file in files:
            if not file.is_file():
                raise CheckpointError(f"{file}: listed in {INDEX_FILE} but missing")
        return files
    found = sorted(checkpoint.glob("*.safetensors"))
    if not found:
        raise CheckpointError(f"{checkpoint}: no *.safetensors weights and no {INDEX_FILE}")
    return {file: None for file in found}


def _open(file: Path, device: str):
    try:
        return safe_open(str(file), framework="pt", device=device)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{file}: unreadable or truncated safetensors file ({err})") from err


def _scan(files: dict[Path, list[str] | None]) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """Every tensor's file and shape, from the headers alone."""
    found: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for file, listed in files.items():
        with _open(file, "cpu") as f:
            names = set(f.keys())
            if listed is not None and not set(listed) <= names:
                missing = sorted(set(listed) - names)
                raise CheckpointError(f"{file}: lacks tensors its index lists: {', '.join(missing[:5])}")
            for name in names:
                if name in found:
                    raise CheckpointError(f"{name}: stored twice ({found[name][0].name} and {file.name})")
                found[name] = (file, tuple(f.get_slice(name).get_shape()))
    return found


def _check(model: nn.Module, found: dict[str, tuple[Path, tuple[int, ...]]]) -> None:
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    stored = {n: v for n, v in found.items() if not n.startswith(IGNORED_PREFIXES)}
    missing = sorted(set(expected) - set(stored))
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"missing tensor(s): {', '.join(missing[:5])}{more}")
    unexpected = sorted(set(stored) - set(expected))
    if unexpected:
        more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
        raise CheckpointError(f"unexpected tensor(s): {', '.join(unexpected[:5])}{more}")
    for name, shape in expected.items():
        file, got = stored[name]
        if got != shape:
            raise CheckpointError(f"{name}: shape {list(got)} in {file.name}, the config needs {list(shape)}")


def _iter_tensors(files: Iterator[Path], device: torch.device,
                  dtype_of: Callable[[str], torch.dtype]) -> Iterator[tuple[str, torch.Tensor]]:
    for file in files:
        with _open(file, str(device)) as f:
            for name in f.keys():
                if not name.startswith(IGNORED_PREFIXES):
                    yield name, f.get_tensor(name).to(dtype_of(name))


def gemm_weights(model: HiDreamO1) -> set[str]:
    """Names of the decoder's and generation parts' Linear weights and biases (not the ViT's)."""
    names = set()
    for mod_name, module in model.named_modules():
        if isinstance(module, Linear) and not mod_name.startswith("model.visual."):
            names.update(f"{mod_name}.{p}" for p, _ in module.named_parameters())
    return names


def _materialize_buffers(model: HiDreamO1, device: torch.device) -> None:
    """Non-persistent buffers (the ViT's rotary frequencies) were built on the meta device."""
    visual = model.model.visual
    rotary = type(visual.rotary_pos_emb)(visual.config)
    visual.rotary_pos_emb = rotary.to(device)


def load_model(checkpoint: Path, device: torch.device, dtype: torch.dtype, spec: ModelSpec | None = None,
               gemm_dtype: torch.dtype | None = None) -> HiDreamO1:
    """Build the model on the meta device and fill it straight from the files on `device` in `dtype`.

    `gemm_dtype`: the decoder's and generation parts' Linear weights in that dtype instead, the rest
    (embeddings, norms, the ViT) in `dtype`: bf16 GEMMs on a float32 residual stream. The ViT then
    runs under autocast to `gemm_dtype`, as the official code's "fp32" mode runs everything.
    Every problem is found from the headers before any weight is read: a missing, unexpected or
    misshapen tensor raises CheckpointError naming it.
    """
    spec = spec or load_spec(checkpoint)
    files = weight_files(checkpoint)
    with torch.device("meta"):
        model = HiDreamO1(spec)
    _check(model, _scan(files))
    gemms = gemm_weights(model) if gemm_dtype is not None else set()
    loaded: set[str] = set()
    batch: dict[str, torch.Tensor] = {}
    for name, tensor in _iter_tensors(iter(files), device, lambda n: gemm_dtype if n in gemms else dtype):
        batch[name] = tensor
        if len(batch) >= 64:
            model.load_state_dict(batch, strict=False, assign=True)
            loaded.update(batch)
            batch = {}
    model.load_state_dict(batch, strict=False, assign=True)
    loaded.update(batch)
    _materialize_buffers(model, device)
    model.vision_autocast = gemm_dtype
    still_meta = [n for n, p in model.state_dict().items() if p.is_meta]
    if still_meta:  # guarded by _check; a file changing under us would land here
        raise CheckpointError(f"tensor(s) not loaded: {', '.join(still_meta[:5])}")
    return model.eval().requires_grad_(False)
