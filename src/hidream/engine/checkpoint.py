"""Opening a checkpoint, an official directory or a single `.safetensors` file, and loading its weights.

Tensor names are the official ones, one to one (a single file may nest them under `diffusion_model.`).
fp8 weights load as they are stored: a `float8_e4m3fn` weight (or its bytes as `uint8`, as ComfyUI's
mixed-precision files may keep them) with a scale beside it (`X.weight_scale` or `X.scale_weight`,
per tensor or per output row) becomes an fp8 Linear. Every problem is found from the headers before
any weight is read: a missing, unexpected or misshapen tensor raises CheckpointError naming it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from hidream.engine import singlefile
from hidream.engine.config import ModelSpec, Variant, choose_variant, read_config, spec_from_dict
from hidream.engine.errors import CheckpointError
from hidream.engine.layers import Linear
from hidream.engine.model import HiDreamO1
from hidream.engine.tensorfile import Entry, read_header, read_tensor

log = logging.getLogger("hidream.engine")

INDEX_FILE = "model.safetensors.index.json"
# Present in the published checkpoints, not needed to generate images.
IGNORED_PREFIXES = ("lm_head.",)
# How some single files nest the official names.
NESTING = ("model.diffusion_model.", "diffusion_model.")
FP8 = torch.float8_e4m3fn
SCALE_SUFFIXES = (".weight_scale", ".scale_weight")  # ComfyUI's mixed-precision name, and its older one
INPUT_SCALE_SUFFIXES = (".input_scale", ".scale_input")  # static activation scales: activations are scaled per call
QUANT_SUFFIX = ".comfy_quant"  # per-layer JSON naming the format
MARKERS = ("scaled_fp8",)  # an empty tensor older fp8 files carry to say what they are
# The linear layers `quantize` stores in fp8 (as fp8.quantize_model does): the decoder layers' projections.
DECODER_LINEAR = re.compile(r"^model\.language_model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)$")


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


def _scan(files: dict[Path, list[str] | None]) -> tuple[dict[str, Entry], dict[str, str]]:
    """Every tensor's place, from the headers alone, and the (first file's) metadata."""
    found: dict[str, Entry] = {}
    metadata: dict[str, str] = {}
    for file, listed in files.items():
        header = read_header(file)
        metadata = metadata or header.metadata
        names = set(header.entries)
        if listed is not None and not set(listed) <= names:
            missing = sorted(set(listed) - names)
            raise CheckpointError(f"{file}: lacks tensors its index lists: {', '.join(missing[:5])}")
        for name, entry in header.entries.items():
            if name in found:
                raise CheckpointError(f"{name}: stored twice ({found[name].file.name} and {file.name})")
            found[name] = entry
    return found, metadata


def _unnest(entries: dict[str, Entry]) -> dict[str, Entry]:
    """Official names: a nesting prefix that every model tensor carries is taken off."""
    if any(n.startswith("model.language_model.") for n in entries):
        return entries
    for prefix in NESTING:
        if any(n.startswith(prefix + "model.language_model.") for n in entries):
            return {n.removeprefix(prefix): e for n, e in entries.items()}
    return entries


def _quant_format(entry: Entry, name: str) -> str:
    with open(entry.file, "rb") as f:
        raw = bytes(read_tensor(f, entry).reshape(-1).to(torch.uint8).tolist())
    try:
        return str(json.loads(raw)["format"])
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{name}: not a JSON object with a 'format' ({err})") from err


@dataclass
class Checkpoint:
    """A checkpoint opened from its headers: no weight read yet."""

    path: Path
    spec: ModelSpec
    config: dict  # the config.json the spec was made from
    tensors: dict[str, Entry]  # the model's tensors by official name (an fp8 layer's weight among them)
    scales: dict[str, Entry | None]  # fp8 layers (`...mlp.down_proj`): their stored weight scale, if any
    extra: dict[str, Entry]  # stored, not part of the model (lm_head)
    assets: dict[str, str]  # tokenizer and processor files by name
    variant: Variant
    metadata: dict[str, str] = field(default_factory=dict)
    single_file: bool = False
    assets_from: str = ""  # where the assets came from, for messages
    _processors: tuple | None = None

    def processors(self):
        """(tokenizer, image processor), loaded once."""
        if self._processors is None:
            with tempfile.TemporaryDirectory(prefix="hidream-tokenizer-") as tmp:
                for name, text in self.assets.items():
                    (Path(tmp) / name).write_text(text, encoding="utf-8")
                self._processors = load_processors(Path(tmp), self.assets_from)
        return self._processors


class LazyImageProcessor:
    """The checkpoint's Qwen2-VL image processor, built from its preprocessor_config.json when first used: only
    references need it, and importing transformers' image-processing stack costs seconds of every start
    (a text-to-image `hidream generate` never pays them). CheckpointError naming the file if it cannot be built."""

    def __init__(self, config: dict, where: str) -> None:
        self._config, self._where, self._processor = config, where, None

    def _get(self):
        if self._processor is None:
            from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

            try:
                self._processor = Qwen2VLImageProcessorPil.from_dict(dict(self._config))
            except (OSError, ValueError, TypeError) as err:
                raise CheckpointError(f"{self._where}/preprocessor_config.json: unusable ({err})") from err
        return self._processor

    def __call__(self, *args, **kwargs):
        return self._get()(*args, **kwargs)

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._get(), name)


def load_processors(directory: Path, shown: str | None = None):
    """The tokenizer and image processor (a LazyImageProcessor) of a directory; CheckpointError naming what
    is missing or unreadable."""
    from transformers import AutoTokenizer

    where = shown or str(directory)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, TypeError) as err:
        raise CheckpointError(f"{where}: tokenizer files missing or unreadable ({err})") from err
    path = directory / "preprocessor_config.json"
    if not path.is_file():
        raise CheckpointError(f"{where}: preprocessor_config.json missing")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeError, ValueError) as err:
        raise CheckpointError(f"{where}/preprocessor_config.json: unreadable ({err})") from err
    if not isinstance(config, dict):
        raise CheckpointError(f"{where}/preprocessor_config.json: unreadable (not a JSON object)")
    return tokenizer, LazyImageProcessor(config, where)


def _sort(entries: dict[str, Entry]) -> tuple[dict[str, Entry], dict[str, Entry | None], dict[str, Entry]]:
    """Model tensors, fp8 layers with their scales, and tensors kept but not used."""
    model: dict[str, Entry] = {}
    scales: dict[str, Entry] = {}
    formats: dict[str, str] = {}
    extra: dict[str, Entry] = {}
    for name, entry in entries.items():
        if name in MARKERS or name.endswith(INPUT_SCALE_SUFFIXES):
            continue
        if name.startswith(IGNORED_PREFIXES):
            extra[name] = entry
        elif name.endswith(QUANT_SUFFIX):
            formats[name.removesuffix(QUANT_SUFFIX)] = _quant_format(entry, name)
        elif name.endswith(SCALE_SUFFIXES):
            layer = name.rsplit(".", 1)[0]
            if layer in scales:
                raise CheckpointError(f"{name}: a second weight scale for {layer}")
            scales[layer] = entry
        else:
            model[name] = entry
    fp8: dict[str, Entry | None] = {}
    for name, entry in model.items():
        if not name.endswith(".weight"):
            continue
        layer = name.removesuffix(".weight")
        fmt = formats.get(layer)
        if fmt is not None and fmt != "float8_e4m3fn":
            raise CheckpointError(f"{layer}{QUANT_SUFFIX}: format {fmt!r} is not supported (float8_e4m3fn is); "
                                  "use the file's bf16 or fp8_scaled version")
        if entry.dtype == torch.float8_e5m2:
            raise CheckpointError(f"{name}: float8_e5m2 weights are not supported (float8_e4m3fn is)")
        if entry.dtype == FP8 or (fmt is not None and entry.dtype == torch.uint8):
            model[name] = dataclasses.replace(entry, dtype=FP8)
            fp8[layer] = scales.pop(layer, None)
    if scales:
        layer, entry = next(iter(scales.items()))
        raise CheckpointError(f"{entry.file.name}: a weight scale for {layer}, whose weight is not float8_e4m3fn")
    return model, fp8, extra


def _assets(path: Path, single: bool, metadata: dict[str, str],
            tokenizer: Path | None) -> tuple[dict[str, str], Path | None, str]:
    """The tokenizer and processor files, the directory they came from (None: the file's metadata), and
    how to name their source in messages."""
    if tokenizer is not None:
        tokenizer = tokenizer.expanduser()
        if not tokenizer.is_dir() or not singlefile.has_tokenizer(tokenizer):
            raise CheckpointError(f"--tokenizer {tokenizer}: not a directory with tokenizer.json or "
                                  "tokenizer_config.json (the official repository's small files)")
        return singlefile.asset_texts(tokenizer), tokenizer, str(tokenizer)
    if not single:
        return singlefile.asset_texts(path), path, str(path)
    embedded = singlefile.embedded_assets(path, metadata)
    if embedded is not None:
        return embedded, None, f"{path} (its embedded tokenizer)"
    if singlefile.has_tokenizer(path.parent):
        return singlefile.asset_texts(path.parent), path.parent, str(path.parent)
    raise CheckpointError(f"{path}: the file carries no tokenizer and none is beside it: give --tokenizer DIR "
                          "(the official repository's tokenizer and preprocessor files, without the weights)")


def open_checkpoint(path: str | Path, tokenizer: str | Path | None = None,
                    variant: Variant | None = None) -> Checkpoint:
    """Open an official checkpoint directory or a single `.safetensors` file from its headers."""
    path = Path(path).expanduser()
    if path.is_dir():
        single = False
        raw = read_config(path)  # the directory's config.json comes first: no weight file is opened without it
        entries, metadata = _scan(weight_files(path))
    elif path.is_file():
        if path.suffix != ".safetensors":
            raise CheckpointError(f"{path}: not a checkpoint: give a directory in the official layout "
                                  "or a single .safetensors file")
        single, raw = True, None
        entries, metadata = _scan({path: None})
    else:
        raise CheckpointError(f"{path}: no such checkpoint directory or file")
    tensors, scales, extra = _sort(_unnest(entries))
    assets, assets_dir, assets_from = _assets(path, single, metadata,
                                              Path(tokenizer) if tokenizer is not None else None)
    ckpt = Checkpoint(path, None, {}, tensors, scales, extra, assets, "full", metadata, single,  # type: ignore[arg-type]
                      assets_from)
    where = path / "config.json"
    if single:
        raw = singlefile.embedded_config(path, metadata)
        where = Path(f"{path} (metadata {singlefile.CONFIG_KEY})")
        if raw is None and assets_dir is not None and (assets_dir / "config.json").is_file():
            raw, where = read_config(assets_dir), assets_dir / "config.json"
        if raw is None:
            tok, _ = ckpt.processors()
            ids = {t: tok.convert_tokens_to_ids(t) for t in singlefile.CONFIG_TOKENS}
            shapes = {n: e.shape for n, e in tensors.items()}
            raw = singlefile.infer_config(shapes, ids, path)
            where = Path(f"{path} (configuration inferred from the tensor shapes)")
            log.info("configuration of %s inferred from its tensor shapes", path.name)
    assert raw is not None
    if not any(n.startswith(singlefile.DEEPSTACK) for n in tensors) and (raw.get("vision_config") or {}).get(
            "deepstack_visual_indexes"):
        log.warning("%s has no DeepStack mergers (model.visual.deepstack_merger_list): reference images reach the "
                    "decoder without DeepStack features; text-to-image is unchanged", path.name)
        raw = {**raw, "vision_config": {**raw["vision_config"], "deepstack_visual_indexes": []}}
    ckpt.spec, ckpt.config = spec_from_dict(raw, where), raw
    ckpt.variant = choose_variant(path, variant)
    return ckpt


def _check(model: nn.Module, ckpt: Checkpoint) -> None:
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    stored = ckpt.tensors
    missing = sorted(set(expected) - set(stored))
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"missing tensor(s): {', '.join(missing[:5])}{more}")
    unexpected = sorted(set(stored) - set(expected))
    if unexpected:
        more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
        raise CheckpointError(f"unexpected tensor(s): {', '.join(unexpected[:5])}{more}")
    for name, shape in expected.items():
        got = stored[name]
        if got.shape != shape:
            raise CheckpointError(f"{name}: shape {list(got.shape)} in {got.file.name}, the config needs {list(shape)}")
    modules = dict(model.named_modules())
    for layer, scale in ckpt.scales.items():
        if not isinstance(modules.get(layer), nn.Linear):
            raise CheckpointError(f"{layer}.weight: float8 weights are only supported on linear layers")
        rows = expected[layer + ".weight"][0]
        if scale is not None and scale.shape not in ((), (1,), (rows,), (rows, 1)):
            raise CheckpointError(f"{layer}: weight scale of shape {list(scale.shape)} in {scale.file.name}; "
                                  f"must be one number or one per output row ({rows})")


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


def _read_all(ckpt: Checkpoint, names: set[str], convert: Callable[[str, torch.Tensor], torch.Tensor]):
    """(name, converted tensor) for `names`, file by file in storage order."""
    by_file: dict[Path, list[tuple[str, Entry]]] = {}
    for name in names:
        entry = ckpt.tensors.get(name) or ckpt.scales.get(name.removesuffix(".weight_scale"))
        assert entry is not None
        by_file.setdefault(entry.file, []).append((name, entry))
    for file, items in by_file.items():
        with open(file, "rb") as f:
            for name, entry in sorted(items, key=lambda item: item[1].start):
                yield name, convert(name, read_tensor(f, entry))


def load_model(checkpoint: Path | Checkpoint, device: torch.device, dtype: torch.dtype, spec: ModelSpec | None = None,
               gemm_dtype: torch.dtype | None = None, quantize: bool = False,
               host: tuple[str, ...] = ()) -> HiDreamO1:
    """Build the model on the meta device and fill it straight from the files on `device` in `dtype`.

    `gemm_dtype`: the decoder's and generation parts' Linear weights in that dtype instead, the rest
    (embeddings, norms, the ViT) in `dtype`: bf16 GEMMs on a float32 residual stream. The ViT then
    runs under autocast to `gemm_dtype`, as the official code's "fp32" mode runs everything.
    fp8 layers keep their stored fp8 weights and compute in the dtype their weight would have had.
    `quantize`: the decoder layers' linear weights are quantized to fp8 (a scale per row) one by one
    as they are read, on `device`: a bf16 checkpoint never needs its full size there.
    `host`: tensors named under these prefixes are loaded into host memory instead (embed_tokens on CUDA).
    """
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else open_checkpoint(checkpoint)
    with torch.device("meta"):
        model = HiDreamO1(spec or ckpt.spec)
    _check(model, ckpt)
    gemms = gemm_weights(model) if gemm_dtype is not None else set()

    def dtype_of(name: str) -> torch.dtype:
        return gemm_dtype if name in gemms else dtype  # type: ignore[return-value]

    to_quantize = {n.removesuffix(".weight") for n in ckpt.tensors
                   if quantize and DECODER_LINEAR.match(n.removesuffix(".weight"))} - set(ckpt.scales)
    fp8_weights = {layer + ".weight" for layer in (*ckpt.scales, *to_quantize)}
    batch: dict[str, torch.Tensor] = {}
    cpu = torch.device("cpu")

    def convert(name: str, t: torch.Tensor) -> torch.Tensor:
        return t.to(cpu if name.startswith(host) else device, dtype_of(name))

    for name, tensor in _read_all(ckpt, set(ckpt.tensors) - fp8_weights, convert):
        batch[name] = tensor
        if len(batch) >= 64:
            model.load_state_dict(batch, strict=False, assign=True)
            batch = {}
    model.load_state_dict(batch, strict=False, assign=True)
    if ckpt.scales or to_quantize:
        _load_fp8(model, ckpt, to_quantize, device, dtype_of)
    _materialize_buffers(model, device)
    model.vision_autocast = gemm_dtype
    still_meta = [n for n, p in model.state_dict().items() if p.is_meta]
    if still_meta:  # guarded by _check; a file changing under us would land here
        raise CheckpointError(f"tensor(s) not loaded: {', '.join(still_meta[:5])}")
    return model.eval().requires_grad_(False)


def _load_fp8(model: HiDreamO1, ckpt: Checkpoint, to_quantize: set[str], device: torch.device,
              dtype_of: Callable[[str], torch.dtype]) -> None:
    """Each fp8 layer becomes an Fp8Linear: a stored one with its weight and scale (1 when the file has
    none), one in `to_quantize` with its weight quantized on `device`."""
    from hidream.engine.fp8 import Fp8Linear, quantize_weight

    stored = {layer + ".weight" for layer in ckpt.scales}
    stored |= {layer + ".weight_scale" for layer, scale in ckpt.scales.items() if scale is not None}
    names = stored | {layer + ".weight" for layer in to_quantize}

    def layers():
        for name, tensor in _read_all(ckpt, names, lambda n, t: t.to(device)):
            layer = name.rsplit(".", 1)[0]
            if layer in to_quantize:
                yield layer, *quantize_weight(tensor)
            elif name.endswith(".weight_scale"):
                yield layer, None, tensor.float()
            else:
                yield layer, tensor, None

    parts: dict[str, list] = {}
    for layer, weight, scale in layers():
        got = parts.setdefault(layer, [None, None])
        got[0] = weight if weight is not None else got[0]
        got[1] = scale if scale is not None else got[1]
        if got[0] is None or (got[1] is None and (layer in to_quantize or ckpt.scales.get(layer) is not None)):
            continue  # its other half is still to come
        weight, scale = parts.pop(layer)
        if scale is None:
            scale = torch.ones((), device=device)
        parent, _, child = layer.rpartition(".")
        old = model.get_submodule(layer)
        new = Fp8Linear.from_quantized(weight, scale, old.bias, dtype_of(layer + ".weight"))
        setattr(model.get_submodule(parent), child, new)
